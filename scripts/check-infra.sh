#!/usr/bin/env bash
# Scan infra/ (Bicep) with checkov. Exits non-zero on any failed check, on any Bicep file
# checkov could not parse (it would otherwise be skipped silently), on a skip without a
# reason, or when nothing was scanned. Skips are justified beside their resource:
#   //checkov:skip=CKV_AZURE_NN: why this does not apply here
# checkov reads Bicep with pycep, which is stricter than Bicep in places (for one, it rejects
# more than four consecutive comment lines inside an object): the parse check catches that.
# checkov runs from its own virtual environment (.venv-infra): its many pinned dependencies
# would fight the project's. The environment is created once and reused while the pin holds.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
VENV=.venv-infra
PYTHON=${PYTHON:-python3}

if [[ "$("$VENV/bin/checkov" --version 2>/dev/null || true)" != "$CHECKOV_VERSION" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "checkov==$CHECKOV_VERSION"
fi

unjustified=$(grep -rnE 'checkov:skip=[A-Z0-9_]+ *(:[[:space:]]*)?$' infra || true)
if [[ -n "$unjustified" ]]; then
    echo "check-infra: every checkov skip needs a reason after the check id:" >&2
    echo "$unjustified" >&2
    exit 1
fi

report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
status=0
"$VENV/bin/checkov" --directory infra --framework bicep --skip-download --compact --quiet \
    --output cli --output json --output-file-path "console,$report/results.json" || status=$?

"$VENV/bin/python" - "$report/results.json" <<'PY'
import json
import sys

with open(sys.argv[1]) as handle:
    summary = json.load(handle)["summary"]
problems = []
if summary["parsing_errors"]:
    problems.append(f"{summary['parsing_errors']} Bicep file(s) could not be parsed")
if summary["resource_count"] == 0:
    problems.append("no resource was scanned")
for problem in problems:
    print(f"check-infra: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
exit "$status"
