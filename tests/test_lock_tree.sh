# Description: the lock order is stated once (src/lock.h) and every mention of a lock is real. Labels: unit
#
# Checks, on the source tree (no build needed):
#   1. docs/architecture.md's copy of the lock tree (the fenced block under
#      "## Lock order") is the tree in src/lock.h, line for line.
#   2. Each line of the tree that names a lock (STRUCT->MEMBER) names a
#      `struct ks_mutex MEMBER` field of `struct STRUCT` in src/, its rank
#      (NAME N) is `LOCK_RANK_NAME = N` in enum lock_rank, and every such
#      field of a named struct is in the tree.
#   3. Every comment in src/, include/, tests/, bench/ and every line of
#      docs/ that names a lock as WORD->...lock names one from (2): a lock
#      that no ks_mutex_init() creates (say `srv_client->lock`) fails.
# KVSTASH_SOURCE_DIR (set by ctest) or this script's parent is the tree.
set -u
cd "${KVSTASH_SOURCE_DIR:-$(dirname "$0")/..}" || exit 1
fail=0
bad() {
	echo "test_lock_tree: $*"
	fail=1
}

# The tree in lock.h: after the " * Lock tree:" paragraph's blank " *" line,
# up to the next blank " *" line; the " * " prefix removed.
tree_h=$(awk '/^ \* Lock tree:/ { s = 1; next }
	s == 1 && /^ \*$/ { s = 2; next }
	s == 2 && /^ \*$/ { exit }
	s == 2 { sub(/^ \* ?/, ""); print }' src/lock.h)
tree_doc=$(awk '/^## Lock order/ { s = 1; next }
	s == 1 && /^```/ { s = 2; next }
	s == 2 && /^```/ { exit }
	s == 2 { print }' docs/architecture.md)
[ -n "$tree_h" ] || bad "no lock tree found in src/lock.h (a ' * Lock tree:' paragraph)"
if [ "$tree_h" != "$tree_doc" ]; then
	bad "docs/architecture.md's lock tree differs from src/lock.h's:"
	diff <(echo "$tree_h") <(echo "$tree_doc") | sed 's/^/    /'
fi

# Every ks_mutex field of a named struct, as STRUCT->MEMBER.
fields=$(awk 'match($0, /^[ \t]*(typedef )?struct [a-z_0-9]+ \{/) {
		n = $0; sub(/^[ \t]*(typedef )?struct /, "", n); sub(/ \{.*/, "", n); cur = n; next }
	/^[ \t]*(static )?struct \{/ { cur = ""; next }
	/^\};/ { cur = "" }
	match($0, /struct ks_mutex [a-z_0-9]+;/) {
		m = substr($0, RSTART, RLENGTH); sub(/struct ks_mutex /, "", m); sub(/;/, "", m)
		if (cur != "") print cur "->" m }' src/*.c src/*.h | sort -u)
[ -n "$fields" ] || bad "found no struct ks_mutex fields in src/"
# ...and that each member name is one that some ks_mutex_init() initialises.
inits=$(grep -ohE 'ks_mutex_init\(&[^,]+' src/*.c | grep -oE '[a-z_0-9]+$' | sort -u)
for f in $fields; do
	echo "$inits" | grep -qx "${f#*->}" || bad "$f: no ks_mutex_init() of a '${f#*->}' in src/"
done

# The tree's lock lines: name, rank name, rank number.
tree_locks=$(echo "$tree_h" | grep -oE '^ *[a-z_0-9]+->[a-z_0-9]+ +[A-Z_]+ [0-9]+' |
	awk '{ print $1, $2, $3 }')
declare -A in_tree
while read -r name _; do [ -n "$name" ] && in_tree[$name]=1; done <<<"$tree_locks"
for f in $fields; do
	[ -n "${in_tree[$f]:-}" ] || bad "$f is a ks_mutex but not in src/lock.h's lock tree"
done
while read -r name rank num; do
	[ -n "$name" ] || continue
	echo "$fields" | grep -qx "$name" || bad "lock tree names $name: no such ks_mutex field in src/"
	grep -qE "^[[:space:]]*LOCK_RANK_${rank} = ${num}," src/lock.h ||
		bad "lock tree gives $name rank $rank $num: not LOCK_RANK_$rank = $num in enum lock_rank"
done <<<"$tree_locks"

# Locks named in comments (C: the text after /* or //, and " * " lines) and docs.
declare -A known
for f in $fields; do known[$f]=1; done
while read -r where name; do
	[ -n "$name" ] || continue
	[ -n "${known[$name]:-}" ] ||
		bad "$where names '$name': no ks_mutex_init() creates such a lock (src/lock.h lists them)"
done < <(awk '
	FILENAME ~ /\.md$/ { text = $0 }
	FILENAME !~ /\.md$/ {
		text = ""
		if (match($0, /\/\*|\/\//)) text = substr($0, RSTART)
		else if ($0 ~ /^[ \t]*\*/) text = $0
	}
	{
		while (match(text, /[a-z_0-9]+->[a-z_0-9]*lock([^a-z_0-9]|$)/)) {
			m = substr(text, RSTART, RLENGTH)
			sub(/[^a-z_0-9]$/, "", m)
			print FILENAME ":" FNR ":", m
			text = substr(text, RSTART + RLENGTH)
		}
	}' $(ls src/*.c src/*.h src/*.cu include/*.h tests/*.c tests/*.h bench/*.c docs/*.md README.md 2>/dev/null))

[ $fail -eq 0 ] && echo "test_lock_tree: lock tree in src/lock.h and docs/architecture.md agree; every named lock exists"
exit $fail
