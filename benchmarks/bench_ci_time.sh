#!/usr/bin/env bash
# CI time of two commits, measured in the same session (issue 13: "no slower by more than 10 %").
#
# Usage: bash benchmarks/bench_ci_time.sh BASE_REV NEW_REV [RUNS]
#
# For each of RUNS rounds (default 2) it clones this repository twice into a temporary folder,
# checks out BASE_REV and NEW_REV, runs `.ci/run` in each fresh clone (alternating, so drift of
# the machine hits both) and prints the total and pytest seconds of each and their ratio.
# Run it on a quiet machine: each round takes about 10 minutes on 2 cores.
set -euo pipefail

base_rev=${1:?usage: bench_ci_time.sh BASE_REV NEW_REV [RUNS]}
new_rev=${2:?usage: bench_ci_time.sh BASE_REV NEW_REV [RUNS]}
runs=${3:-2}
repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
shared=$(cd "$repo/../shared" 2>/dev/null && pwd || true)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ci_seconds() {  # REV LOG -> "TOTAL PYTEST"
    local rev=$1 log=$2 dir
    dir="$work/$rev"
    rm -rf "$dir"
    mkdir -p "$dir"
    git clone -q "$repo" "$dir/main"
    git -C "$dir/main" checkout -q "$rev"
    if [[ -n $shared ]]; then ln -s "$shared" "$dir/shared"; fi
    if ! bash "$dir/main/.ci/run" >"$log" 2>&1; then
        echo "CI failed at $rev; the end of its log:" >&2
        tail -n 20 "$log" >&2
        return 1
    fi
    local total pytest
    total=$(sed -n 's/^CI passed in \([0-9]*\) s$/\1/p' "$log")
    pytest=$(sed -n 's/^--- pytest: \([0-9]*\) s$/\1/p' "$log")
    rm -rf "$dir"
    echo "$total $pytest"
}

echo "round  base total/pytest  new total/pytest  ratio total  ratio pytest"
for round in $(seq 1 "$runs"); do
    base_times=$(ci_seconds "$base_rev" "$work/base-$round.log")
    new_times=$(ci_seconds "$new_rev" "$work/new-$round.log")
    read -r base_total base_pytest <<<"$base_times"
    read -r new_total new_pytest <<<"$new_times"
    python3 -c "
b, bp, n, np_ = $base_total, $base_pytest, $new_total, $new_pytest
print(f'{$round:5d}  {b:5d} s / {bp:3d} s     {n:5d} s / {np_:3d} s     {n / b:.3f}        {np_ / bp:.3f}')
"
done
