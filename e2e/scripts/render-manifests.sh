#!/usr/bin/env bash
# manifests/ is charts/carve rendered with its default values (plus the
# Namespace object, which Helm users create with --create-namespace): one file
# per chart template, so `kubectl apply -f manifests/` and `helm install` give
# the same objects. `make manifests` rewrites manifests/; the e2e test
# `manifests_are_the_chart_rendered` renders into a scratch directory and
# compares.
#
# Usage: render-manifests.sh HELM OUT_DIR
set -euo pipefail
helm="$1" out="$2"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rendered="$("$helm" template carve "$repo/charts/carve" --namespace carve-system --set namespace.create=true)"
mkdir -p "$out"
rm -f "$out"/*.yaml
# Helm prints each object after `# Source: carve/templates/<file>`, sorted in
# its install order; objects go to the file of their template, in that order.
# Helm's blank line after each object is dropped.
awk -v out="$out" '
  /^# Source: carve\/templates\// {
    file = out "/" substr($0, length("# Source: carve/templates/") + 1)
    if (!(file in seen)) {
      seen[file] = 1
      print "# Rendered from charts/carve by `make manifests`: edit the chart, not this file." > file
    } else {
      print "---" >> file
    }
    blanks = 0
    next
  }
  /^---$/ { next }
  /^$/ { blanks++; next }
  file != "" {
    for (; blanks > 0; blanks--) print "" >> file
    print >> file
  }
' <<<"$rendered"
