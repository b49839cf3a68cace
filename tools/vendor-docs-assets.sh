#!/usr/bin/env bash
# Fetch the Swagger UI and ReDoc files that /schema/swagger and /schema/redoc load, from the
# npm registry at pinned versions, and store them gzip-compressed in the package (the
# service sends them as they are to browsers that accept gzip, and nothing is loaded from a
# CDN at runtime). Run from the repository root; commit what changes.
set -euo pipefail
SWAGGER=5.18.2
REDOC=2.5.4
out=src/etlsvc/api/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$SWAGGER" "redoc@$REDOC" >/dev/null \
  && mkdir swagger redoc && tar xzf "swagger-ui-dist-$SWAGGER.tgz" -C swagger \
  && tar xzf "redoc-$REDOC.tgz" -C redoc)
for f in swagger-ui-bundle.js swagger-ui-standalone-preset.js swagger-ui.css; do
  gzip -9 -n -c "$work/swagger/package/$f" > "$out/$f.gz"
done
# ReDoc shows its logo from its CDN at the foot of the menu: point it at our icon instead.
sed 's#https://cdn.redoc.ly/redoc/logo-mini.svg#/console/assets/favicon.svg#' \
  "$work/redoc/package/bundles/redoc.standalone.js" | gzip -9 -n > "$out/redoc.standalone.js.gz"
cat "$work/swagger/package/LICENSE" > "$out/LICENSE.swagger-ui"
cat "$work/redoc/package/LICENSE" > "$out/LICENSE.redoc"
printf 'swagger-ui-dist %s\nredoc %s\n' "$SWAGGER" "$REDOC" > "$out/VERSIONS"
