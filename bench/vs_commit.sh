#!/bin/bash
# The XDP established path of this tree beside an older commit's, in one run.
#
#   bench/vs_commit.sh REV [ROUNDS]        (root; REV e.g. e7f9527)
#
# An older object may not load with this tree's agent (map names and layouts
# change), so each side runs its own per_packet bench: REV's built in a git
# worktree under /tmp/ferry-vs-commit/ (outside this workspace, which cargo
# would take it for a member of), this tree's as `cargo bench` builds it.
# They run alternately, ROUNDS times (default 3) in the order new, old, old,
# new, each `--quick` at 10 Services. Per run the script takes the medians of
# `xdp established, wrapped` and its floor (`xdp PASS only, wrapped
# (floor)`), both from that run; the table gives each run's net (row minus
# floor) and the ratio of the means of the nets, new/old.
set -euo pipefail
rev=${1:?usage: bench/vs_commit.sh REV [ROUNDS]}
rounds=${2:-3}
root=$(git rev-parse --show-toplevel)
cd "$root"
old_tree=${TMPDIR:-/tmp}/ferry-vs-commit/$(git rev-parse --short "$rev")
if [ ! -d "$old_tree" ]; then
    git worktree add --detach "$old_tree" "$rev" >&2
fi
build() { # prints the bench binary's path
    (cd "$1" && cargo xtask build-ebpf >&2 &&
        cargo bench -p proxy-agent --bench per_packet --no-run --message-format=json 2>/dev/null) |
        sed -n 's/.*"executable":"\([^"]*per_packet[^"]*\)".*/\1/p' | tail -1
}
old_bin=$(build "$old_tree")
new_bin=$(build "$root")
[ -x "$old_bin" ] && [ -x "$new_bin" ] || { echo "a bench did not build" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
net() { # median of the established row minus its floor, from a run's table
    awk -F'|' '
        $3 ~ /^ xdp established, wrapped $/ { e = $4 }
        $3 ~ /^ xdp PASS only, wrapped \(floor\) $/ { f = $4 }
        END { if (e == "" || f == "") exit 1; printf "%d %d %d\n", e, f, e - f }' "$1"
}
echo "| round | side | established ns | floor ns | net ns |"
echo "|---:|---|---:|---:|---:|"
for round in $(seq "$rounds"); do
    for side in new old old new; do
        bin=$new_bin dir=$root
        [ "$side" = old ] && bin=$old_bin dir=$old_tree
        out=$scratch/$round-$side-$RANDOM.md
        args=(--quick --out "$out")
        # The old bench may have no --scales: it then runs every scale,
        # and the table's 10-Service rows are the ones read.
        if grep -q -- '--scales' "$dir/proxy-agent/benches/per_packet.rs"; then
            args+=(--scales 10)
        fi
        (cd "$dir" && "$bin" "${args[@]}" >/dev/null 2>&1)
        grep '^| 10 |' "$out" > "$out.10"
        read -r est floor n <<<"$(net "$out.10")"
        echo "| $round | $side | $est | $floor | $n |"
        echo "$side $n" >> "$scratch/nets"
    done
done
# The median of each side's nets (a run disturbed by the machine moves it
# less than the mean), and the mean beside it.
summary() { # side -> "median mean"
    awk -v side="$1" '$1 == side { print $2 }' "$scratch/nets" | sort -n |
        awk '{ v[NR] = $1; s += $1 } END {
            m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.1f %.1f\n", m, s / NR }'
}
read -r new_median new_mean <<<"$(summary new)"
read -r old_median old_mean <<<"$(summary old)"
awk -v nm="$new_median" -v om="$old_median" -v na="$new_mean" -v oa="$old_mean" 'BEGIN {
    printf "\nnet ns, median of the runs: new %.1f, old %.1f; new/old %.3f\n", nm, om, nm / om
    printf "net ns, mean of the runs: new %.1f, old %.1f; new/old %.3f\n", na, oa, na / oa }'
