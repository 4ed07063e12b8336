#!/usr/bin/env bash
# Prints the first Debian mirror in this machine's apt sources (one-line and deb822 formats),
# never a security or third-party repository, without a trailing slash. Scripts that debootstrap
# a tree (scripts/rabbitmq4.sh, scripts/compose-check.sh) take their mirror from here, so none of
# them names a mirror's host. Exits 1, printing nothing, when the sources name no Debian mirror.
set -euo pipefail

found=$({
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -E 's/\[[^]]*\]//' | awk '$1 == "deb" && $3 !~ /security/ {print $2}'
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk 'BEGIN {RS = ""; FS = "\n"}
      {
        deb = 0; sec = 0; uris = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
          if ($i ~ /^Suites:/ && $i ~ /security/) sec = 1
          if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
        }
        if (deb && !sec && uris != "") { split(uris, u, /[ \t]+/); print u[1] }
      }' "$f"
  done
} | grep -E '/debian/?$' | head -n 1 || true)
[ -n "$found" ] || exit 1
echo "${found%/}"
