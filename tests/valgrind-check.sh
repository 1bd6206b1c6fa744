#!/bin/sh
# Fails when any valgrind log in DIR reports an error or a definite leak.
# Logs of workers the tests SIGKILLed end without a summary: nothing to
# read there, and nothing skipped either (errors are printed as they happen).
set -eu
dir=${1:?usage: valgrind-check.sh DIR}
n=$(ls "$dir" | wc -l)
bad=$(grep -lE 'ERROR SUMMARY: [1-9]|definitely lost: [1-9]|Invalid (read|write|free)|uninitialised' \
	"$dir"/vg.*.log 2>/dev/null || true)
if [ -n "$bad" ]; then
	for f in $bad; do
		echo "==== $f"
		cat "$f"
	done
	echo "valgrind: errors or definite leaks in $(echo "$bad" | wc -l) of $n processes"
	exit 1
fi
summaries=$(grep -l 'ERROR SUMMARY: 0 errors' "$dir"/vg.*.log 2>/dev/null | wc -l)
echo "valgrind: $n processes, $summaries ran to exit with 0 errors and no definite leak"
