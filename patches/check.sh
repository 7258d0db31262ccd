#!/usr/bin/env bash
# Checks every patch series under patches/ without needing upstream's code:
#
# - each series directory (kms-v*) has a `series` file; every line names a
#   patch file that exists, and every *.patch file is listed exactly once;
# - each patch is `git format-patch` output: "From <sha> Mon Sep 17 ..." header,
#   From:/Date:/Subject: lines, "[PATCH n/m]" numbered in series order, a
#   commit message, a diffstat, and diffs that `git apply --stat` parses;
# - no patch touches Cargo.lock (the lockfile is resolved at build time
#   against the operator's instrumented-kms checkout).
#
# Applying the series to upstream is checked by hand (docs/runbook.md,
# "Maintaining the patches"): CI cannot reach upstream.
#
# Usage: bash patches/check.sh   (exit status 0 when every series is well-formed)
set -euo pipefail
cd "$(dirname "$0")"

failures=0
fail() {
    echo "patches/check.sh: $*" >&2
    failures=$((failures + 1))
}

series_dirs=(kms-v*/)
if [ ! -d "${series_dirs[0]}" ]; then
    fail "no series directories (kms-v*/) found"
fi

for dir in "${series_dirs[@]}"; do
    dir=${dir%/}
    if [ ! -f "$dir/series" ]; then
        fail "$dir: missing series file"
        continue
    fi
    mapfile -t listed < <(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$dir/series")
    if [ "${#listed[@]}" -eq 0 ]; then
        fail "$dir/series lists no patches"
        continue
    fi
    # Every file listed once, every patch file listed.
    dupes=$(printf '%s\n' "${listed[@]}" | sort | uniq -d)
    [ -z "$dupes" ] || fail "$dir/series lists more than once: $dupes"
    for patch in "$dir"/*.patch; do
        [ -e "$patch" ] || continue
        name=$(basename "$patch")
        printf '%s\n' "${listed[@]}" | grep -qxF "$name" || fail "$dir/$name is not listed in $dir/series"
    done

    total=${#listed[@]}
    n=0
    for name in "${listed[@]}"; do
        n=$((n + 1))
        patch="$dir/$name"
        if [ ! -f "$patch" ]; then
            fail "$dir/series lists $name, which does not exist"
            continue
        fi
        case "$name" in
            $(printf '%04d' "$n")-*.patch) ;;
            *) fail "$patch: expected file name $(printf '%04d' "$n")-*.patch at position $n" ;;
        esac
        head -n1 "$patch" | grep -Eq '^From [0-9a-f]{40} Mon Sep 17 00:00:00 2001$' \
            || fail "$patch: first line is not a git format-patch 'From <sha> Mon Sep 17 00:00:00 2001' header"
        grep -q '^From: ' "$patch" || fail "$patch: no From: header"
        grep -q '^Date: ' "$patch" || fail "$patch: no Date: header"
        grep -Eq "^Subject: \[PATCH $n/$total\] .+" "$patch" \
            || fail "$patch: no 'Subject: [PATCH $n/$total] ...' line"
        # A message body (why) between the headers and the '---' separator.
        body_lines=$(awk '/^Subject: /{s=1; next} s && /^---$/{exit} s && !/^ / && NF {c++} END{print c+0}' "$patch")
        [ "$body_lines" -ge 3 ] || fail "$patch: commit message explains too little ($body_lines lines)"
        grep -q '^---$' "$patch" || fail "$patch: no '---' separator before the diff"
        grep -Eq '^ [0-9]+ files? changed' "$patch" || fail "$patch: no diffstat"
        grep -q '^diff --git a/' "$patch" || fail "$patch: no diff"
        if grep -Eq '^diff --git a/Cargo.lock ' "$patch"; then
            fail "$patch: touches Cargo.lock"
        fi
        if ! git apply --stat "$patch" >/dev/null 2>/tmp/patch-check.$$; then
            fail "$patch: git apply cannot parse it: $(head -n1 /tmp/patch-check.$$)"
        fi
        rm -f /tmp/patch-check.$$
    done
    echo "$dir: $total patches checked"

    # Every library name the series calls is also compiled by api-check.
    names=$(cat "$dir"/*.patch | grep '^+' | grep -v '^+++' \
        | grep -oE 'instrumented_kms::(\{[^}]*\}|[A-Za-z_]+)' \
        | sed -e 's/^instrumented_kms:://' -e 's/[{}]//g' | tr ',' '\n' | tr -d ' ' | sort -u)
    for name in $names; do
        grep -qE "(instrumented_kms::|[{ ,])$name\b" api-check/src/lib.rs \
            || fail "$dir calls instrumented_kms::$name, which api-check/src/lib.rs does not"
    done
done

if [ "$failures" -ne 0 ]; then
    echo "patches/check.sh: $failures problem(s)" >&2
    exit 1
fi
echo "patches/check.sh: all series well-formed"
