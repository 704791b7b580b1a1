#!/usr/bin/env bash
# Fetch the real datasets that ship inside packages (see README, "Data"). Idempotent.
set -euo pipefail
CACHE=${UNIREP_CACHE:-$HOME/.cache/unirep}
mkdir -p "$CACHE/packages"

# Fashion-MNIST: Debian package (as root), else unpacked into the cache without root.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && \
   [ ! -f "$CACHE/packages/fashion-mnist/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[data] apt-get install dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[data] not root: unpacking dataset-fashion-mnist into $CACHE/packages/fashion-mnist"
    tmp=$(mktemp -d); (cd "$tmp" && apt-get download dataset-fashion-mnist) && \
      dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$CACHE/packages/fashion-mnist"; rm -rf "$tmp"
  fi
fi

# Emoji art (Google: Apache-2.0, Twemoji: CC-BY-4.0) from npm; only the 64 px images are kept.
for style in google twitter; do
  dest="$CACHE/packages/emoji-datasource-$style"
  if [ ! -f "$dest/package/emoji.json" ]; then
    if ! command -v npm >/dev/null; then
      echo "[data] npm not found: install Node.js/npm (apt-get install -y npm) for the emoji datasets" >&2
      continue
    fi
    echo "[data] npm pack emoji-datasource-$style"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q "emoji-datasource-$style@16.0.0" >/dev/null && \
      tar xzf emoji-datasource-$style-*.tgz package/emoji.json "package/img/$style/64")
    mkdir -p "$dest" && rm -rf "$dest/package" && mv "$tmp/package" "$dest/package"
    rm -rf "$tmp"
  fi
done
# Icon themes, labelled by freedesktop context (the `icons:theme=...` built-ins): held-out probe
# targets, no source trains on them. Unpacked into the cache (no root needed).
for theme in gnome:gnome tango:Tango mate:mate; do
  name=${theme%%:*}; folder=${theme#*:}; pkg=$name-icon-theme; dest="$CACHE/packages/icons-$name"
  if [ ! -d "/usr/share/icons/$folder/16x16" ] && [ ! -d "$dest/usr/share/icons/$folder/16x16" ]; then
    echo "[data] unpacking $pkg into $dest"
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1); then
      dpkg -x "$tmp"/"$pkg"_*.deb "$dest"
    else
      echo "[data] could not download $pkg: run \`apt-get update\` once (or install it: apt-get install -y $pkg)" >&2
    fi
    rm -rf "$tmp"
  fi
done
echo "[data] ready under $CACHE"
